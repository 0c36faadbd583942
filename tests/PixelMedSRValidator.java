// PixelMed's DicomSRValidator on several files in one JVM (tests/validators.py runs it).
//
// DicomSRValidator's own main takes one file; building the validator compiles its template
// stylesheets (seconds), so one JVM per file would spend most of its time doing that again.
// Each file is validated exactly as that main does it (the same options: no -describe, code
// meanings matched by case) and its report printed after a line "==== <path>".
// Run with the JDK's source launcher: java -cp pixelmed.jar PixelMedSRValidator.java FILE...

import com.pixelmed.validate.DicomSRValidator;

public class PixelMedSRValidator {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("==== " + path);
            try {
                System.out.print(validator.validate(path, false, true, false, false, false));
            } catch (Exception e) {
                // one unreadable file is an error of that file, not the end of the others
                System.out.println("Error: validator failed: " + e);
            }
            System.out.println();
        }
    }
}
